"""The operator console (Streamlit): `icl console` or `streamlit run ui/app.py`.

It talks to a PersonSearch service over gRPC only, through the API package (`icl_api`); it
never imports the ML core, Triton or Milvus (import-linter contract)."""
