"""Random-weight Hugging Face model directories, built the same on every machine from files here."""
