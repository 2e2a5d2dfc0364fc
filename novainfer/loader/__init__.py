"""Model loading helpers: resolving a model argument to a Hugging Face folder."""
