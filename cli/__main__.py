from icl.cli import app

app()
