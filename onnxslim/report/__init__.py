"""Renderers: result dataclasses as terminal tables, JSON and Markdown. They render only and compute nothing.

One module per command (`inspect`, `bench`, `prune`, `sensitivity`, `quantize`, `optimize` with `sweep`),
`groups` for the channel-group table two commands show, and `format` for what they share. Import from the
module you need: this package imports none of them, so rendering one command does not load the others.
"""
