"""Generated protobuf and gRPC code for tokenbroker.v1 (`make proto` regenerates it; do not edit)."""
