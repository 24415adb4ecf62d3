"""Integrations of fastattn with other libraries (each imports its library only when used).

    fastattn.integrations.transformers.register()   # attn_implementation="fastattn" in Hugging Face transformers
"""
