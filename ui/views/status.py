"""Status: the service's health, its dependencies, the gallery and recent latency."""

from __future__ import annotations

import streamlit as st

from icl_console import service

st.title("Status")

settings = service.settings()
overall = service.health()
st.metric("PersonSearch at " + settings.address, overall)
if overall != "SERVING":
    st.error(
        "The service is not serving: searches will fail until it is back.", icon=":material/error:"
    )
# The service publishes each dependency's readiness under its own health name.
DEPENDENCIES = {
    "triton-encoders": "Triton: text and image encoders",
    "triton-mllm": "Triton: the MLLM (THI)",
    "milvus": "Milvus: the gallery",
}
if not overall.startswith("unreachable"):
    for column, (name, label) in zip(st.columns(3), DEPENDENCIES.items(), strict=True):
        state = service.health(name)
        column.metric(label, "not configured" if "NOT_FOUND" in state else state)

if not overall.startswith("unreachable"):
    try:
        stats = service.call(service.client().gallery_stats)
    except service.ServiceError as error:
        service.show_error(error)
    else:
        st.subheader(f"Gallery: {stats.images} images")
        st.bar_chart({c.camera_id: c.images for c in stats.cameras}, horizontal=True)

if settings.metrics_url:
    try:
        samples = service.scrape_metrics(settings.metrics_url)
    except OSError as exc:
        st.warning(f"Metrics at {settings.metrics_url} not readable: {exc}")
    else:

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        st.metric("Gallery images", int(value("icl_gallery_images")))
        rows = []
        for (name, labels), count in samples.items():
            if name != "icl_request_duration_seconds_count" or not count:
                continue
            total = samples.get(("icl_request_duration_seconds_sum", labels), 0.0)
            rows.append(
                {**dict(labels), "calls": int(count), "mean ms": round(1000 * total / count, 1)}
            )
        st.subheader("Calls since the service started")
        st.dataframe(rows, hide_index=True, width="stretch")
        stages = []
        for (name, labels), count in samples.items():
            if name == "icl_stage_duration_seconds_count" and count:
                total = samples.get(("icl_stage_duration_seconds_sum", labels), 0.0)
                stages.append(
                    {**dict(labels), "runs": int(count), "mean ms": round(1000 * total / count, 1)}
                )
        st.subheader("Stages")
        st.dataframe(stages, hide_index=True, width="stretch")
else:
    st.caption(
        "Start the console with the service's metrics URL (--metrics-url) to see latency "
        "and gallery size."
    )
