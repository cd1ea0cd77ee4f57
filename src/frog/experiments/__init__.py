"""One module per experiment of the paper, the full reproduction, and the learning-rate search
(:mod:`.tune`); each only wires library calls together."""
