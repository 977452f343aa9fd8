"""Where the target carries a LatentQA behaviour: a linear probe per reading position (README.md)."""
