"""Streamlit dashboards: thin views over probe and analyses results (run: ``headwise dashboard``)."""
