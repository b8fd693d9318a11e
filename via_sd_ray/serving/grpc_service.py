"""Registers the ``via_sd.v1.ViaSD`` service with Serve's gRPC proxy, decoding requests leniently.

The generated ``add_ViaSDServicer_to_server`` decodes with ``GenerateRequest.FromString``, which
runs inside Serve's proxy before any via-sd code: a corrupt message or a string field holding
non-UTF-8 bytes then fails there with grpcio's bare ``UNKNOWN``. This registration keeps the
generated message classes and method names but decodes with :func:`decode_request`, which never
raises: a message it cannot read becomes a :class:`WireError` that the ingress answers with
``INVALID_ARGUMENT`` naming the field.

Two more services ride on the same proxy: ``grpc.health.v1.Health`` (answered by the ingress: SERVING
once every tier is ready, serving/health.py) and server reflection v1 (answered by the proxy itself,
beside Serve's v1alpha). ``grpc_options.grpc_servicer_functions`` lists all three: ``SERVICER_FUNCTIONS``.
"""

from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb

SERVICE = "via_sd.v1.ViaSD"
RAY_SERVE_API = "ray.serve.RayServeAPIService"  # Serve's own service on its proxy (ListApplications, Healthz)


@dataclass(frozen=True)
class WireError:
    """A request message that could not be decoded: ``message`` says which field and why."""

    message: str


def decode_request(raw: bytes) -> "pb.GenerateRequest | WireError":
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError as err:
        return WireError(_describe(raw, pb.GenerateRequest.DESCRIPTOR, str(err)))


def _describe(raw: bytes, descriptor, reason: str) -> str:
    name = descriptor.full_name
    try:
        bad = _bad_utf8_field(raw, descriptor)
    except ValueError:  # the wire format itself is broken: no field to blame
        bad = None
    if bad is not None:
        return f"{bad}: expected UTF-8 text (a proto3 string), received bytes that are not valid UTF-8"
    return (f"request: expected a serialized {name} (proto/via_sd.proto), "
            f"received bytes protobuf cannot decode ({reason})")


def _bad_utf8_field(raw: bytes, descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field whose bytes are not UTF-8, or None.
    Raises ValueError where the bytes are not protobuf wire format at all."""
    repeated = {}
    for number, wire_type, value in _fields(raw):
        field = descriptor.fields_by_number.get(number)
        if field is None or wire_type != 2:
            continue
        index = repeated.get(number, 0)
        repeated[number] = index + 1
        label = f"{prefix}{field.name}" + (f".{index}" if _repeated(field) else "")
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return label
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            bad = _bad_utf8_field(value, field.message_type, f"{label}.")
            if bad is not None:
                return bad
    return None


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (``label`` is gone from its upb descriptors)
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _fields(raw: bytes):
    """(field number, wire type, bytes of a length-delimited value or None) for each field of a message."""
    pos = 0
    while pos < len(raw):
        tag, pos = _varint(raw, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, pos = _varint(raw, pos)
            yield number, wire_type, None
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            yield number, wire_type, None
        elif wire_type == 2:
            size, pos = _varint(raw, pos)
            if pos + size > len(raw):
                raise ValueError("truncated length-delimited field")
            yield number, wire_type, raw[pos:pos + size]
            pos += size
        else:  # groups (3, 4) are not proto3; 6 and 7 do not exist
            raise ValueError(f"wire type {wire_type}")
    if pos != len(raw):
        raise ValueError("truncated fixed-width field")


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated varint")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def add_ViaSDServicer_to_server(servicer, server) -> None:  # noqa: N802 (grpcio's naming)
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=decode_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=decode_request,
            response_serializer=pb.GenerateChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)



HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# every servicer function of this module, for grpc_options.grpc_servicer_functions (all configs list them)
SERVICER_FUNCTIONS = tuple(f"{__name__}.{name}" for name in (
    "add_ViaSDServicer_to_server", "add_HealthServicer_to_server", "add_ReflectionV1Servicer_to_server"))


# the services grpc.health.v1.Health knows: "" is the server as a whole
HEALTH_SERVICES = ("", SERVICE)


def health_status(service: str, reason: str | None) -> "health_pb2.HealthCheckResponse.ServingStatus | None":
    """The grpc.health.v1 status of ``service``, given why the server is not ready (None: it is ready);
    None for a service the server does not know."""
    if service not in HEALTH_SERVICES:
        return None
    return health_pb2.HealthCheckResponse.SERVING if reason is None else health_pb2.HealthCheckResponse.NOT_SERVING


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802 (grpcio's naming)
    """``grpc.health.v1.Health`` (Check, Watch): under Serve's proxy, answered by the ``Ingress`` methods of
    the same names (serving/health.py says when it is SERVING)."""
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def add_ReflectionV1Servicer_to_server(servicer, server) -> None:  # noqa: N802 (grpcio's naming)
    """Server reflection v1 (``grpc.reflection.v1.ServerReflection``) beside the v1alpha one Ray Serve
    registers itself (``grpc_options.enable_reflection``). The two protocols are identical on the wire,
    so grpcio-reflection's v1alpha servicer answers under the v1 name. Registered as a passthrough
    service, it runs in Serve's proxy instead of being routed to the ingress (``servicer`` is unused)."""
    add_passthrough = getattr(server, "add_passthrough_service", None)  # Serve's gRPCGenericServer
    if add_passthrough is not None:
        add_passthrough(REFLECTION_V1)
    answers = _ReflectionV1(server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            answers.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, handlers),))
    server.add_registered_method_handlers(REFLECTION_V1, handlers)


class _ReflectionV1(reflection.aio.ReflectionServicer):
    """Lists the services registered on ``server`` when asked, so servicer functions listed after this
    one (and Serve's own v1alpha reflection) are included; Serve's internal API service is not."""

    def __init__(self, server):
        super().__init__(())
        self._server = server

    def _list_services(self, request):
        handlers = getattr(self._server, "generic_rpc_handlers", ())  # Serve's gRPCGenericServer keeps them
        names = {method.split("/")[1] for group in handlers for method in group[0]._method_handlers}
        self._service_names = tuple(sorted(names - {RAY_SERVE_API}))
        return super()._list_services(request)
