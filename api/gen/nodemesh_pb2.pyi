from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Resource(_message.Message):
    __slots__ = ("namespace", "type", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    type: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., type: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("ip", "namespace", "name", "node", "owner", "labels", "ready", "uid", "start_time_ms", "terminating", "ips", "service_account")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IP_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TERMINATING_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ip: str
    namespace: str
    name: str
    node: str
    owner: Resource
    labels: _containers.ScalarMap[str, str]
    ready: bool
    uid: str
    start_time_ms: int
    terminating: bool
    ips: _containers.RepeatedScalarFieldContainer[str]
    service_account: str
    def __init__(self, ip: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., node: _Optional[str] = ..., owner: _Optional[_Union[Resource, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., ready: _Optional[bool] = ..., uid: _Optional[str] = ..., start_time_ms: _Optional[int] = ..., terminating: _Optional[bool] = ..., ips: _Optional[_Iterable[str]] = ..., service_account: _Optional[str] = ...) -> None: ...

class ServicePort(_message.Message):
    __slots__ = ("name", "port", "target_port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    target_port: int
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., target_port: _Optional[int] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("ip", "ready", "pod", "node")
    IP_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ip: str
    ready: bool
    pod: str
    node: str
    def __init__(self, ip: _Optional[str] = ..., ready: _Optional[bool] = ..., pod: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("namespace", "name", "cluster_ip", "ports", "endpoints")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_IP_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    cluster_ip: str
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., cluster_ip: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("agent_id", "node", "version", "start_time_ms", "node_ip", "pod_cidrs", "identity_encodings")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    POD_CIDRS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    node: str
    version: str
    start_time_ms: int
    node_ip: str
    pod_cidrs: _containers.RepeatedScalarFieldContainer[str]
    identity_encodings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., node: _Optional[str] = ..., version: _Optional[str] = ..., start_time_ms: _Optional[int] = ..., node_ip: _Optional[str] = ..., pod_cidrs: _Optional[_Iterable[str]] = ..., identity_encodings: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("ready", "capture_installed", "time_ms", "capture_mode", "capture_mode_reason")
    READY_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_INSTALLED_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_MODE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_MODE_REASON_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    capture_installed: bool
    time_ms: int
    capture_mode: str
    capture_mode_reason: str
    def __init__(self, ready: _Optional[bool] = ..., capture_installed: _Optional[bool] = ..., time_ms: _Optional[int] = ..., capture_mode: _Optional[str] = ..., capture_mode_reason: _Optional[str] = ...) -> None: ...

class Series(_message.Message):
    __slots__ = ("name", "labels", "value", "bucket_counts", "sum", "created_ms", "ref")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    value: float
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    created_ms: int
    ref: int
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ..., created_ms: _Optional[int] = ..., ref: _Optional[int] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("agent_id", "seq", "time_ms", "latency_bounds_ms", "series", "increments", "replayed", "columns")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUNDS_MS_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    INCREMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    seq: int
    time_ms: int
    latency_bounds_ms: _containers.RepeatedScalarFieldContainer[float]
    series: _containers.RepeatedCompositeFieldContainer[Series]
    increments: bool
    replayed: bool
    columns: SeriesColumns
    def __init__(self, agent_id: _Optional[str] = ..., seq: _Optional[int] = ..., time_ms: _Optional[int] = ..., latency_bounds_ms: _Optional[_Iterable[float]] = ..., series: _Optional[_Iterable[_Union[Series, _Mapping]]] = ..., increments: _Optional[bool] = ..., replayed: _Optional[bool] = ..., columns: _Optional[_Union[SeriesColumns, _Mapping]] = ...) -> None: ...

class SeriesColumns(_message.Message):
    __slots__ = ("refs", "values", "hist_refs", "hist_sums", "hist_counts")
    REFS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    HIST_REFS_FIELD_NUMBER: _ClassVar[int]
    HIST_SUMS_FIELD_NUMBER: _ClassVar[int]
    HIST_COUNTS_FIELD_NUMBER: _ClassVar[int]
    refs: bytes
    values: bytes
    hist_refs: bytes
    hist_sums: bytes
    hist_counts: bytes
    def __init__(self, refs: _Optional[bytes] = ..., values: _Optional[bytes] = ..., hist_refs: _Optional[bytes] = ..., hist_sums: _Optional[bytes] = ..., hist_counts: _Optional[bytes] = ...) -> None: ...

class IdentityResync(_message.Message):
    __slots__ = ("epoch", "version", "reason")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    version: int
    reason: str
    def __init__(self, epoch: _Optional[int] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "metrics", "tap_event", "status", "identity_resync", "scrape_review", "csr")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TAP_EVENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_RESYNC_FIELD_NUMBER: _ClassVar[int]
    SCRAPE_REVIEW_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    metrics: MetricsReport
    tap_event: TapEvent
    status: AgentStatus
    identity_resync: IdentityResync
    scrape_review: ScrapeReview
    csr: CertificateSigningRequest
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., metrics: _Optional[_Union[MetricsReport, _Mapping]] = ..., tap_event: _Optional[_Union[TapEvent, _Mapping]] = ..., status: _Optional[_Union[AgentStatus, _Mapping]] = ..., identity_resync: _Optional[_Union[IdentityResync, _Mapping]] = ..., scrape_review: _Optional[_Union[ScrapeReview, _Mapping]] = ..., csr: _Optional[_Union[CertificateSigningRequest, _Mapping]] = ...) -> None: ...

class CertificateSigningRequest(_message.Message):
    __slots__ = ("id", "pod_uid", "csr_der")
    ID_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    id: int
    pod_uid: str
    csr_der: bytes
    def __init__(self, id: _Optional[int] = ..., pod_uid: _Optional[str] = ..., csr_der: _Optional[bytes] = ...) -> None: ...

class CertificateIssued(_message.Message):
    __slots__ = ("id", "pod_uid", "certificate_pem", "spiffe_id", "not_after_ms", "error", "trust_bundle")
    ID_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    id: int
    pod_uid: str
    certificate_pem: bytes
    spiffe_id: str
    not_after_ms: int
    error: str
    trust_bundle: TrustBundle
    def __init__(self, id: _Optional[int] = ..., pod_uid: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., spiffe_id: _Optional[str] = ..., not_after_ms: _Optional[int] = ..., error: _Optional[str] = ..., trust_bundle: _Optional[_Union[TrustBundle, _Mapping]] = ...) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("trust_domain", "roots_pem")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    roots_pem: bytes
    def __init__(self, trust_domain: _Optional[str] = ..., roots_pem: _Optional[bytes] = ...) -> None: ...

class ScrapeReview(_message.Message):
    __slots__ = ("id", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: int
    token: str
    def __init__(self, id: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class ScrapeReviewResult(_message.Message):
    __slots__ = ("id", "allowed", "unavailable", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    allowed: bool
    unavailable: bool
    message: str
    def __init__(self, id: _Optional[int] = ..., allowed: _Optional[bool] = ..., unavailable: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class MeshConfig(_message.Message):
    __slots__ = ("opaque_ports", "excluded_namespaces", "tap_max_rps", "tap_redact_headers", "tap_show_headers", "tap_redact_query", "routes", "mtls_required_namespaces")
    OPAQUE_PORTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    TAP_MAX_RPS_FIELD_NUMBER: _ClassVar[int]
    TAP_REDACT_HEADERS_FIELD_NUMBER: _ClassVar[int]
    TAP_SHOW_HEADERS_FIELD_NUMBER: _ClassVar[int]
    TAP_REDACT_QUERY_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    MTLS_REQUIRED_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    opaque_ports: _containers.RepeatedScalarFieldContainer[int]
    excluded_namespaces: _containers.RepeatedScalarFieldContainer[str]
    tap_max_rps: float
    tap_redact_headers: _containers.RepeatedScalarFieldContainer[str]
    tap_show_headers: _containers.RepeatedScalarFieldContainer[str]
    tap_redact_query: bool
    routes: _containers.RepeatedCompositeFieldContainer[WorkloadRoutes]
    mtls_required_namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, opaque_ports: _Optional[_Iterable[int]] = ..., excluded_namespaces: _Optional[_Iterable[str]] = ..., tap_max_rps: _Optional[float] = ..., tap_redact_headers: _Optional[_Iterable[str]] = ..., tap_show_headers: _Optional[_Iterable[str]] = ..., tap_redact_query: _Optional[bool] = ..., routes: _Optional[_Iterable[_Union[WorkloadRoutes, _Mapping]]] = ..., mtls_required_namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class RouteRule(_message.Message):
    __slots__ = ("name", "method", "path", "path_type", "grpc", "grpc_service", "grpc_method")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_TYPE_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICE_FIELD_NUMBER: _ClassVar[int]
    GRPC_METHOD_FIELD_NUMBER: _ClassVar[int]
    name: str
    method: str
    path: str
    path_type: str
    grpc: bool
    grpc_service: str
    grpc_method: str
    def __init__(self, name: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., path_type: _Optional[str] = ..., grpc: _Optional[bool] = ..., grpc_service: _Optional[str] = ..., grpc_method: _Optional[str] = ...) -> None: ...

class WorkloadRoutes(_message.Message):
    __slots__ = ("workload", "rules")
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    workload: Resource
    rules: _containers.RepeatedCompositeFieldContainer[RouteRule]
    def __init__(self, workload: _Optional[_Union[Resource, _Mapping]] = ..., rules: _Optional[_Iterable[_Union[RouteRule, _Mapping]]] = ...) -> None: ...

class IdentitySnapshot(_message.Message):
    __slots__ = ("resource_version", "pods", "services", "config", "captured_namespaces", "epoch", "version")
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    resource_version: str
    pods: _containers.RepeatedCompositeFieldContainer[Pod]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    config: MeshConfig
    captured_namespaces: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    version: int
    def __init__(self, resource_version: _Optional[str] = ..., pods: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ..., services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ..., config: _Optional[_Union[MeshConfig, _Mapping]] = ..., captured_namespaces: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class IdentityDelta(_message.Message):
    __slots__ = ("epoch", "base_version", "version", "pods", "removed_pods", "services", "removed_services", "config", "namespaces_changed", "captured_namespaces")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_PODS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SERVICES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    base_version: int
    version: int
    pods: _containers.RepeatedCompositeFieldContainer[Pod]
    removed_pods: _containers.RepeatedScalarFieldContainer[str]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    removed_services: _containers.RepeatedCompositeFieldContainer[Resource]
    config: MeshConfig
    namespaces_changed: bool
    captured_namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epoch: _Optional[int] = ..., base_version: _Optional[int] = ..., version: _Optional[int] = ..., pods: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ..., removed_pods: _Optional[_Iterable[str]] = ..., services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ..., removed_services: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., config: _Optional[_Union[MeshConfig, _Mapping]] = ..., namespaces_changed: _Optional[bool] = ..., captured_namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class CompressedIdentity(_message.Message):
    __slots__ = ("encoding", "data", "size")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    data: bytes
    size: int
    def __init__(self, encoding: _Optional[str] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class TapOpen(_message.Message):
    __slots__ = ("tap_id", "filter")
    TAP_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    tap_id: str
    filter: TapFilter
    def __init__(self, tap_id: _Optional[str] = ..., filter: _Optional[_Union[TapFilter, _Mapping]] = ...) -> None: ...

class TapClose(_message.Message):
    __slots__ = ("tap_id",)
    TAP_ID_FIELD_NUMBER: _ClassVar[int]
    tap_id: str
    def __init__(self, tap_id: _Optional[str] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("seq", "controller_epoch", "series_refs", "series_columns")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SERIES_REFS_FIELD_NUMBER: _ClassVar[int]
    SERIES_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    controller_epoch: int
    series_refs: bool
    series_columns: bool
    def __init__(self, seq: _Optional[int] = ..., controller_epoch: _Optional[int] = ..., series_refs: _Optional[bool] = ..., series_columns: _Optional[bool] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("identity", "tap_open", "tap_close", "identity_delta", "report_ack", "identity_compressed", "scrape_review_result", "certificate", "trust_bundle")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TAP_OPEN_FIELD_NUMBER: _ClassVar[int]
    TAP_CLOSE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_DELTA_FIELD_NUMBER: _ClassVar[int]
    REPORT_ACK_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    SCRAPE_REVIEW_RESULT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    identity: IdentitySnapshot
    tap_open: TapOpen
    tap_close: TapClose
    identity_delta: IdentityDelta
    report_ack: ReportAck
    identity_compressed: CompressedIdentity
    scrape_review_result: ScrapeReviewResult
    certificate: CertificateIssued
    trust_bundle: TrustBundle
    def __init__(self, identity: _Optional[_Union[IdentitySnapshot, _Mapping]] = ..., tap_open: _Optional[_Union[TapOpen, _Mapping]] = ..., tap_close: _Optional[_Union[TapClose, _Mapping]] = ..., identity_delta: _Optional[_Union[IdentityDelta, _Mapping]] = ..., report_ack: _Optional[_Union[ReportAck, _Mapping]] = ..., identity_compressed: _Optional[_Union[CompressedIdentity, _Mapping]] = ..., scrape_review_result: _Optional[_Union[ScrapeReviewResult, _Mapping]] = ..., certificate: _Optional[_Union[CertificateIssued, _Mapping]] = ..., trust_bundle: _Optional[_Union[TrustBundle, _Mapping]] = ...) -> None: ...

class TapFilter(_message.Message):
    __slots__ = ("target", "to", "method", "path_prefix", "authority", "scheme", "max_rps")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIX_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    MAX_RPS_FIELD_NUMBER: _ClassVar[int]
    target: Resource
    to: Resource
    method: str
    path_prefix: str
    authority: str
    scheme: str
    max_rps: float
    def __init__(self, target: _Optional[_Union[Resource, _Mapping]] = ..., to: _Optional[_Union[Resource, _Mapping]] = ..., method: _Optional[str] = ..., path_prefix: _Optional[str] = ..., authority: _Optional[str] = ..., scheme: _Optional[str] = ..., max_rps: _Optional[float] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("ip", "port", "namespace", "pod", "owner")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    namespace: str
    pod: str
    owner: Resource
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., namespace: _Optional[str] = ..., pod: _Optional[str] = ..., owner: _Optional[_Union[Resource, _Mapping]] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class RequestInit(_message.Message):
    __slots__ = ("method", "scheme", "authority", "path", "headers")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    method: str
    scheme: str
    authority: str
    path: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    def __init__(self, method: _Optional[str] = ..., scheme: _Optional[str] = ..., authority: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ...) -> None: ...

class ResponseInit(_message.Message):
    __slots__ = ("http_status", "since_request_init_us", "headers")
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    SINCE_REQUEST_INIT_US_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    http_status: int
    since_request_init_us: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    def __init__(self, http_status: _Optional[int] = ..., since_request_init_us: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ...) -> None: ...

class ResponseEnd(_message.Message):
    __slots__ = ("has_grpc_status", "grpc_status", "reset_error", "since_request_init_us", "response_bytes")
    HAS_GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    RESET_ERROR_FIELD_NUMBER: _ClassVar[int]
    SINCE_REQUEST_INIT_US_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    has_grpc_status: bool
    grpc_status: int
    reset_error: str
    since_request_init_us: int
    response_bytes: int
    def __init__(self, has_grpc_status: _Optional[bool] = ..., grpc_status: _Optional[int] = ..., reset_error: _Optional[str] = ..., since_request_init_us: _Optional[int] = ..., response_bytes: _Optional[int] = ...) -> None: ...

class TapEvent(_message.Message):
    __slots__ = ("tap_id", "request_id", "direction", "source", "destination", "node", "time_ms", "request_init", "response_init", "response_end", "tls", "client_id", "server_id")
    TAP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_INIT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_INIT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_END_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    tap_id: str
    request_id: str
    direction: str
    source: Peer
    destination: Peer
    node: str
    time_ms: int
    request_init: RequestInit
    response_init: ResponseInit
    response_end: ResponseEnd
    tls: bool
    client_id: str
    server_id: str
    def __init__(self, tap_id: _Optional[str] = ..., request_id: _Optional[str] = ..., direction: _Optional[str] = ..., source: _Optional[_Union[Peer, _Mapping]] = ..., destination: _Optional[_Union[Peer, _Mapping]] = ..., node: _Optional[str] = ..., time_ms: _Optional[int] = ..., request_init: _Optional[_Union[RequestInit, _Mapping]] = ..., response_init: _Optional[_Union[ResponseInit, _Mapping]] = ..., response_end: _Optional[_Union[ResponseEnd, _Mapping]] = ..., tls: _Optional[bool] = ..., client_id: _Optional[str] = ..., server_id: _Optional[str] = ...) -> None: ...

class TapRequest(_message.Message):
    __slots__ = ("filter",)
    FILTER_FIELD_NUMBER: _ClassVar[int]
    filter: TapFilter
    def __init__(self, filter: _Optional[_Union[TapFilter, _Mapping]] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("selector", "all_namespaces", "to", "window_seconds", "label_selector", "backend")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ALL_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    selector: Resource
    all_namespaces: bool
    to: Resource
    window_seconds: int
    label_selector: str
    backend: str
    def __init__(self, selector: _Optional[_Union[Resource, _Mapping]] = ..., all_namespaces: _Optional[bool] = ..., to: _Optional[_Union[Resource, _Mapping]] = ..., window_seconds: _Optional[int] = ..., label_selector: _Optional[str] = ..., backend: _Optional[str] = ..., **kwargs) -> None: ...

class StatRow(_message.Message):
    __slots__ = ("resource", "meshed_pods", "total_pods", "status", "has_traffic", "success_count", "failure_count", "rps", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "tcp_open_connections", "tcp_read_bytes_rate", "tcp_write_bytes_rate", "has_tcp")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    MESHED_PODS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PODS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HAS_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    RPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P95_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P99_FIELD_NUMBER: _ClassVar[int]
    TCP_OPEN_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    TCP_READ_BYTES_RATE_FIELD_NUMBER: _ClassVar[int]
    TCP_WRITE_BYTES_RATE_FIELD_NUMBER: _ClassVar[int]
    HAS_TCP_FIELD_NUMBER: _ClassVar[int]
    resource: Resource
    meshed_pods: int
    total_pods: int
    status: str
    has_traffic: bool
    success_count: int
    failure_count: int
    rps: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    tcp_open_connections: float
    tcp_read_bytes_rate: float
    tcp_write_bytes_rate: float
    has_tcp: bool
    def __init__(self, resource: _Optional[_Union[Resource, _Mapping]] = ..., meshed_pods: _Optional[int] = ..., total_pods: _Optional[int] = ..., status: _Optional[str] = ..., has_traffic: _Optional[bool] = ..., success_count: _Optional[int] = ..., failure_count: _Optional[int] = ..., rps: _Optional[float] = ..., latency_ms_p50: _Optional[float] = ..., latency_ms_p95: _Optional[float] = ..., latency_ms_p99: _Optional[float] = ..., tcp_open_connections: _Optional[float] = ..., tcp_read_bytes_rate: _Optional[float] = ..., tcp_write_bytes_rate: _Optional[float] = ..., has_tcp: _Optional[bool] = ...) -> None: ...

class StatResponse(_message.Message):
    __slots__ = ("rows", "error", "warning")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[StatRow]
    error: str
    warning: str
    def __init__(self, rows: _Optional[_Iterable[_Union[StatRow, _Mapping]]] = ..., error: _Optional[str] = ..., warning: _Optional[str] = ...) -> None: ...

class EdgesRequest(_message.Message):
    __slots__ = ("selector", "all_namespaces", "window_seconds", "backend")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ALL_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    selector: Resource
    all_namespaces: bool
    window_seconds: int
    backend: str
    def __init__(self, selector: _Optional[_Union[Resource, _Mapping]] = ..., all_namespaces: _Optional[bool] = ..., window_seconds: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class Edge(_message.Message):
    __slots__ = ("src", "dst", "client_id", "server_id", "no_identity_msg", "secured")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    NO_IDENTITY_MSG_FIELD_NUMBER: _ClassVar[int]
    SECURED_FIELD_NUMBER: _ClassVar[int]
    src: Resource
    dst: Resource
    client_id: str
    server_id: str
    no_identity_msg: str
    secured: bool
    def __init__(self, src: _Optional[_Union[Resource, _Mapping]] = ..., dst: _Optional[_Union[Resource, _Mapping]] = ..., client_id: _Optional[str] = ..., server_id: _Optional[str] = ..., no_identity_msg: _Optional[str] = ..., secured: _Optional[bool] = ...) -> None: ...

class EdgesResponse(_message.Message):
    __slots__ = ("edges", "error", "warning")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[Edge]
    error: str
    warning: str
    def __init__(self, edges: _Optional[_Iterable[_Union[Edge, _Mapping]]] = ..., error: _Optional[str] = ..., warning: _Optional[str] = ...) -> None: ...

class RoutesRequest(_message.Message):
    __slots__ = ("selector", "to", "window_seconds", "backend")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    selector: Resource
    to: Resource
    window_seconds: int
    backend: str
    def __init__(self, selector: _Optional[_Union[Resource, _Mapping]] = ..., to: _Optional[_Union[Resource, _Mapping]] = ..., window_seconds: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class RouteRow(_message.Message):
    __slots__ = ("route", "service", "destination", "has_traffic", "success_count", "failure_count", "rps", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "request_count")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    HAS_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    RPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P95_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P99_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    route: str
    service: str
    destination: Resource
    has_traffic: bool
    success_count: int
    failure_count: int
    rps: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    request_count: int
    def __init__(self, route: _Optional[str] = ..., service: _Optional[str] = ..., destination: _Optional[_Union[Resource, _Mapping]] = ..., has_traffic: _Optional[bool] = ..., success_count: _Optional[int] = ..., failure_count: _Optional[int] = ..., rps: _Optional[float] = ..., latency_ms_p50: _Optional[float] = ..., latency_ms_p95: _Optional[float] = ..., latency_ms_p99: _Optional[float] = ..., request_count: _Optional[int] = ...) -> None: ...

class RoutesResponse(_message.Message):
    __slots__ = ("rows", "error", "warning")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RouteRow]
    error: str
    warning: str
    def __init__(self, rows: _Optional[_Iterable[_Union[RouteRow, _Mapping]]] = ..., error: _Optional[str] = ..., warning: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeCheck(_message.Message):
    __slots__ = ("node", "agent_connected", "agent_ready", "capture_installed", "agent_version", "last_report_age_ms", "clock_skew_ms", "capture_mode", "capture_mode_reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_READY_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_INSTALLED_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_MODE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_MODE_REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_connected: bool
    agent_ready: bool
    capture_installed: bool
    agent_version: str
    last_report_age_ms: int
    clock_skew_ms: int
    capture_mode: str
    capture_mode_reason: str
    def __init__(self, node: _Optional[str] = ..., agent_connected: _Optional[bool] = ..., agent_ready: _Optional[bool] = ..., capture_installed: _Optional[bool] = ..., agent_version: _Optional[str] = ..., last_report_age_ms: _Optional[int] = ..., clock_skew_ms: _Optional[int] = ..., capture_mode: _Optional[str] = ..., capture_mode_reason: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("controller_version", "nodes", "time_ms", "stat_backend", "stat_backend_url", "stat_backend_ok", "stat_backend_detail")
    CONTROLLER_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    STAT_BACKEND_FIELD_NUMBER: _ClassVar[int]
    STAT_BACKEND_URL_FIELD_NUMBER: _ClassVar[int]
    STAT_BACKEND_OK_FIELD_NUMBER: _ClassVar[int]
    STAT_BACKEND_DETAIL_FIELD_NUMBER: _ClassVar[int]
    controller_version: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeCheck]
    time_ms: int
    stat_backend: str
    stat_backend_url: str
    stat_backend_ok: bool
    stat_backend_detail: str
    def __init__(self, controller_version: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeCheck, _Mapping]]] = ..., time_ms: _Optional[int] = ..., stat_backend: _Optional[str] = ..., stat_backend_url: _Optional[str] = ..., stat_backend_ok: _Optional[bool] = ..., stat_backend_detail: _Optional[str] = ...) -> None: ...
