"""Integrations with training frameworks. Each imports its framework lazily: importing
``savepoints`` never imports them."""
