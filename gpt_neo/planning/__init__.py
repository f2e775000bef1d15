"""Will it fit, and how to split it: TPU ahead-of-time compiles, the automatic layout,
`--summary` and the layout picture."""
