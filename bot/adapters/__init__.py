"""Chat and web adapters: each turns its platform's events into queue submissions and renders updates."""
