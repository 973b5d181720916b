"""One module per transform."""
