"""Built-in plugins, installed as the chat_plugins package and registered through the same hooks as third-party ones."""
