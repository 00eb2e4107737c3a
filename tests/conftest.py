"""Shared test setup: this folder is on sys.path, so helpers such as ``tinydata`` import directly."""
