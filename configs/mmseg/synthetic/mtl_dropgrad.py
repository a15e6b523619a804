# The DropGrad baseline of paper 000 (Table 4, "DropGrad (p=0.50)"; Table 7) on the same convs
# as mtl_gradsplit.py: no task relation; at every step each filter of layer4 drops each task's
# gradient with probability p (paper 000 §3.1, ~line 100: "When w_t' is a stochastic binary
# mask, it is equivalent to dropping-out gradients [40] with specifically designed dropout
# masks with the drop rate p"; §4.4: "it drops gradients randomly from every filter so that
# the dominant task gradients of a filter can vary during training").
_base_ = ['./mtl_gradsplit.py']
optim_wrapper = dict(mtl=dict(
    gradsplit=dict(_delete_=True, modules=['backbone.layer4.*'], drop_rate=0.5, seed=0,
                   separate_optimizers=True)))
