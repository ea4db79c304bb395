"""Ray Serve applications: the OpenAI-compatible LM endpoint and the NeuroFM inference endpoint."""
