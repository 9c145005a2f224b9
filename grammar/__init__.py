"""The lark grammar of avdsl expressions, shipped as package data."""
