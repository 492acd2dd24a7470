"""Base losses over embeddings (CoSENT, in-batch negatives, Angle, AnglE) and the 2D Matryoshka objective."""
