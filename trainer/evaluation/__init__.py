"""Entity-level metrics and the prediction writers."""
