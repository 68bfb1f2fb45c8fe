"""The fleet protocol: `flotilla.proto` is the contract; the `flotilla_pb2*` modules are generated from it.

Regenerate after editing the .proto (tests/test_proto_current.py fails while they are stale):

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. fleet/proto/flotilla.proto

run from the repository root, so the generated code imports `fleet.proto.flotilla_pb2`.
"""

PROTO_FILE = "fleet/proto/flotilla.proto"
GENERATED_FILES = ("flotilla_pb2.py", "flotilla_pb2.pyi", "flotilla_pb2_grpc.py")
