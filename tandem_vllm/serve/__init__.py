"""Serving: Ray Serve replicas, each a vLLM async engine with Tandem speculation, behind vLLM's own
OpenAI-compatible HTTP app and a gRPC service (``protos/tandem/v1``) on Serve's gRPC proxy."""
