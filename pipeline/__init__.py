"""The Noisy Student loop on Ray: labeling, filtering, balancing, and iteration."""
