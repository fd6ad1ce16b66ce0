"""adapt's command line (Typer). Thin: parse, call ``merge``, print."""
