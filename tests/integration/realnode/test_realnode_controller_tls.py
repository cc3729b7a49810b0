"""The controller's self-provisioned TLS as Kubernetes runs the install (`install --sandbox --as-pods
--set controllerTls=true`): the controller pod fills the Secret and the ConfigMap the manifest
created empty, through the sandbox's API server; the agents, hostNetwork DaemonSet pods that only
have the ConfigMap mounted (`optional`, refreshed by the kubelet), verify the controller with it and
connect (the install waits for every node's agent connected, ready and capturing, over TLS); the
CLI verifies it under the Service's name; a re-apply keeps the CA; plaintext is refused."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import grpc
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from realnode_harness import realnode_mesh


def test_realnode_controller_tls_agents_verify_the_published_ca() -> None:
    with realnode_mesh(nodes=2, sets=("agentWorkers=1", "drainGraceSeconds=5", "controllerTls=true")) as mesh:
        objs = mesh.sb.objects()
        secret = next(o for o in objs.of_kind("Secret") if o["metadata"]["name"] == "nodemesh-controller-tls")
        ca_map = next(o for o in objs.of_kind("ConfigMap") if o["metadata"]["name"] == "nodemesh-controller-ca")
        ca_pem = base64.b64decode(secret["data"]["ca.crt"])
        assert "ca.key" in secret["data"]
        assert ca_map["data"] == {"ca.crt": ca_pem.decode()}  # the certificate alone
        # What every agent pod sees in its mounted volume: the same CA.
        agent_args = " ".join(mesh.sb.pod("nodemesh", mesh.agent_pod(mesh.nodes[0]))["spec"]["containers"][0]["args"])
        assert "--controller-ca /etc/nodemesh-controller-ca/ca.crt" in agent_args
        state = Path(mesh.sb.state_dir)
        assert (state / "controller-ca.crt").read_bytes() == ca_pem

        # The CLI through the sandbox: TLS, verified under nodemesh-controller.nodemesh.svc.
        env = {**os.environ, "NODEMESH_SANDBOX": mesh.sb.name, "NODEMESH_TOKEN": mesh.token}
        env.pop("NODEMESH_CONTROLLER", None)
        res = subprocess.run([sys.executable, "-m", "nodemesh", "check", "--sandbox"], capture_output=True,
                             text=True, env=env, timeout=60, check=False)
        assert res.returncode == 0, res.stdout + res.stderr

        # `kubectl apply` of the install again keeps the CA the controller wrote (data is not in the manifest).
        mesh.apply_install()
        again = mesh.sb.objects()
        assert next(o for o in again.of_kind("Secret") if o["metadata"]["name"] == "nodemesh-controller-tls")["data"] \
            == secret["data"]
        assert next(o for o in again.of_kind("ConfigMap")
                    if o["metadata"]["name"] == "nodemesh-controller-ca")["data"] == ca_map["data"]

        # Plaintext to the controller's port is not spoken.
        with grpc.insecure_channel(mesh.controller) as channel:
            try:
                pb_grpc.ControllerStub(channel).Check(pb.CheckRequest(), timeout=5,
                                                      metadata=(("authorization", f"Bearer {mesh.token}"),))
                raise AssertionError("the controller answered plaintext")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
