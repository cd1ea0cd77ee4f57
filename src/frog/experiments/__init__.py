"""One module per experiment of the paper; each only wires library calls together."""
