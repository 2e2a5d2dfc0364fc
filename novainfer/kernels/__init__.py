"""Triton kernels for the paged KV cache (imported lazily: `import novainfer` never imports triton)."""
