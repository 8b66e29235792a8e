"""Feature families: how the features of SAEs on one hook relate across widths.

    cofiring  an accumulator fed each batch's sparse codes of every SAE (the same tokens), counting
              per pair of SAEs the tokens each pair of features shares
    links     each feature's nearest features in every other SAE, by decoder cosine (exact, in
              chunks) and by co-firing Jaccard, in both directions, with the counts behind it
    layout    2D positions of every feature of a hook by UMAP on decoder directions (the map)
    build     links and layout of a set of SAEs into the store
"""
