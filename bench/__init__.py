"""Benchmarks (not timed tests): each prints its figures and ratios side by side in one run."""

# Prompts the benchmarks cycle through.
PROMPTS = [
    "a lighthouse at dusk",
    "a red fox in fresh snow",
    "a bowl of ramen, top view",
    "an old tram in Lisbon",
    "a glass teapot on a windowsill",
    "a paper crane on a desk",
    "mountains above a sea of clouds",
    "a neon sign reading OPEN",
]
