"""The built-in demo: a small digits CNN (``model``) and its images (``data``), from what the dependencies ship."""
