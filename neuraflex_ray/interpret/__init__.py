"""Looking inside trained models: representation comparisons (and, to come, sparse autoencoders).

    similarity.py   debiased linear CKA, RSA with a split-half noise ceiling, orthogonal Procrustes
                    distance, CCA and SVCCA between two activation matrices of the same inputs
"""
