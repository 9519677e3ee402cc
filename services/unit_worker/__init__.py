"""What the two workers of a unit share: the mapped storage, the model over it, the token stream."""
