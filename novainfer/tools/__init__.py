"""Developer tools behind `novainfer trace` and `novainfer profile` (imported on demand)."""
