# The launch model with bfloat16 autocast and the controller's dynamic loss scaler, which grows
# every finite step here (growth_interval=1) so that a resume must restore a scale that moved.
_base_ = ['tiny_mtl.py']
optim_wrapper = dict(amp=dict(init_scale=16.0, growth_interval=1), amp_dtype='bfloat16')
