"""One module per model family; each registers its FamilySpec."""
