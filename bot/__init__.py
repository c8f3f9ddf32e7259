"""easelbot: the asyncio side (CLI, config, queue, chat adapters); never imports torch."""
