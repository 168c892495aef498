"""Training of KV compressors: a Lightning module over a frozen base model and a data module of long sequences."""
