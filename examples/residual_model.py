"""A network of your own for `streamadapt pretrain --model-builder examples.residual_model:build`.

Any Keras 3 model of Keras' own layers serves, sequential or functional, when it maps the feature vector to
class probabilities. This one normalises its inputs with batch statistics, and adds a residual block with
dropout: a shape the built-in network does not have.
"""
import keras


def build(n_features: int, n_outputs: int, task: str) -> keras.Model:
    """`task` is "repurchase" (one sigmoid unit) or "next_category" (a softmax over n_outputs classes)."""
    inputs = keras.Input(shape=(n_features,))
    x = keras.layers.BatchNormalization()(inputs)
    x = keras.layers.Dense(64, activation="relu")(x)
    block = keras.layers.Dense(64, activation="relu")(keras.layers.Dropout(0.2)(x))
    x = keras.layers.LayerNormalization()(keras.layers.Add()([x, block]))
    if task == "repurchase":
        outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    else:
        outputs = keras.layers.Dense(n_outputs, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="residual")
