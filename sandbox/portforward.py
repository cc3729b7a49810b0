"""`kubectl port-forward` for the sandbox: a node address's ports forwarded into a pod's netns.

    python -m nodemesh.sandbox.portforward --cluster NAME --state-dir DIR --namespace NS \
        --selector app=nodemesh-controller --listen 10.240.0.1 --port 8085 --port 8084

Every accepted connection goes to a Ready pod matching the selector (looked up per connection,
so a replaced pod is followed), dialled from *inside* the pod's network namespace at
127.0.0.1:<port> — what the kubelet does for a port-forward: the connection never crosses the pod
network, so no Service, kube-proxy rule or mesh capture is on its path. Run as a node process
(`Sandbox.start_node_process`), it gives the root namespace a fixed address for a pod-network
workload (the controller of `nodemesh install --sandbox --as-pods`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
from pathlib import Path

from nodemesh.api.clusterstate import read_objects
from nodemesh.sandbox import naming, objects
from nodemesh.sandbox.netlink import socket_in_netns

log = logging.getLogger("nodemesh.sandbox.portforward")


def _target_netns(cluster: str, state_dir: Path, namespace: str, selector: dict[str, str]) -> str | None:
    pods = [p for p in read_objects(state_dir).of_kind("Pod")
            if p["metadata"]["namespace"] == namespace and objects.pod_ready(p)
            and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
    if not pods:
        return None
    pod = min(pods, key=lambda p: p["metadata"]["name"])
    if pod["spec"].get("hostNetwork"):
        return None  # not needed for hostNetwork pods: dial the node address
    return naming.pod_netns(cluster, namespace, pod["metadata"]["name"])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


class Forwarder:
    def __init__(self, cluster: str, state_dir: Path, namespace: str, selector: dict[str, str]) -> None:
        self.cluster, self.state_dir, self.namespace, self.selector = cluster, state_dir, namespace, selector

    async def handle(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer = None
        try:
            ns = _target_netns(self.cluster, self.state_dir, self.namespace, self.selector)
            if ns is None:
                return
            sock = socket_in_netns(ns)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 5)
            except (OSError, TimeoutError):
                sock.close()
                return
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()


async def serve(fwd: Forwarder, host: str, ports: list[int]) -> None:
    servers = [await asyncio.start_server(functools.partial(fwd.handle, port), host, port, reuse_address=True)
               for port in ports]
    log.info("event=port_forward_listening host=%s ports=%s", host, ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nodemesh.sandbox.portforward")
    p.add_argument("--cluster", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--selector", required=True, help="k=v[,k=v]")
    p.add_argument("--listen", required=True)
    p.add_argument("--port", type=int, action="append", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ts=%(asctime)s level=%(levelname)s %(message)s")
    selector = dict(item.split("=", 1) for item in a.selector.split(",") if item)
    asyncio.run(serve(Forwarder(a.cluster, Path(a.state_dir), a.namespace, selector), a.listen, a.port))


if __name__ == "__main__":
    main()
