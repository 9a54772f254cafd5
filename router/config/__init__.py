"""Configuration: the settings tree, the config file and the command line."""
