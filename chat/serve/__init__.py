"""``chat serve``: an OpenAI-compatible server where every persona card is a model on one loaded base."""
