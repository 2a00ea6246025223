"""The operator console: `icl console --address HOST:PORT` (or `streamlit run ui/app.py`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="Person search", page_icon=":material/person_search:", layout="wide")

navigation = st.navigation(
    [
        st.Page(
            HERE / "views" / "search.py", title="Search", icon=":material/search:", default=True
        ),
        st.Page(HERE / "views" / "sightings.py", title="Sightings", icon=":material/timeline:"),
        st.Page(HERE / "views" / "gallery.py", title="Gallery", icon=":material/photo_library:"),
        st.Page(HERE / "views" / "status.py", title="Status", icon=":material/monitor_heart:"),
    ]
)
navigation.run()
