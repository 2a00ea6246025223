"""The service's Triton clients: the encoders, the MLLM, and the readiness check they share.

Only the service talks gRPC to Triton; the ML core (`icl/`) never imports grpc or tritonclient.
"""
