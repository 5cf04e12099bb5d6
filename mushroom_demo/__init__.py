"""The built-in demo, outside the libraries: `painter` draws licence-free mushroom pictures in code, and
`python -m mushroom_demo` runs the whole job on them (generate -> shard -> train -> evaluate -> predict)."""
