"""Tokenizers: VQGAN / FQGAN (CNN), FlexTok and TexTok (ViT)."""
