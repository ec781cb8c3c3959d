"""Device harness: benchmark exported models on CPU and mobile targets."""
