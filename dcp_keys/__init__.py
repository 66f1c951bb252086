"""Keys: encrypted Ethereum V3 keystores, the identity that signs, and the dcp-wallet CLI.

Used by workers (their identity) and job owners (the compute client); imports nothing of ours
but the protocol core (dcp_protocol).
"""
