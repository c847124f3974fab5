"""Small models for end-to-end tests: ``zoo.py`` factories and a tiny Hugging Face config."""
