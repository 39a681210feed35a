"""Published JSON Schemas (package data): the answer every program of cvgl emits."""
