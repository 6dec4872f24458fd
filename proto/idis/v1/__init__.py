"""idis.v1: generated protobuf and gRPC modules. Do not edit; edit the .proto files."""
