"""Task names: the only strings producers and workers must agree on."""

GENERATE = "chroma.generate"
