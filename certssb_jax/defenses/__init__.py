"""Defenses: how each member's training view is made, at which noise each query is voted on, how votes become a
certificate and how answers are made."""
